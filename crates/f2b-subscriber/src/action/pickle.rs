//! The little of Python's pickle format that fail2ban-server's socket needs.
//!
//! Requests are a list of strings, encoded here with protocol 2
//! ([`encode_str_list`]). Replies are whatever fail2ban-server 1.0.2 pickles with
//! `HIGHEST_PROTOCOL` (5 with Python 3.8+): a tuple `(code, result)` where the
//! result may be an int, a string, a list of strings, or (code 1) an exception
//! object, pickled as `GLOBAL module name` + args + `REDUCE`. [`decode`] runs a
//! tolerant, bounded pickle machine: classes are never resolved or called, they
//! become [`Value::Global`] / [`Value::Object`] descriptions. Any input gives a
//! value or a [`PickleError`], never a panic: nesting is limited to [`MAX_DEPTH`],
//! and the work of copying memoised values to [`MAX_WORK`] units.

use std::collections::HashMap;
use std::fmt::Write as _;

/// The deepest nesting of containers accepted in a reply.
pub const MAX_DEPTH: u32 = 64;
/// The most value units (nodes plus string bytes) memo copies may cost in one reply.
pub const MAX_WORK: usize = 4 << 20;

/// Why a reply could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PickleError {
    #[error("pickle ends early (at byte {0})")]
    Truncated(usize),
    #[error("unsupported pickle opcode {opcode:#04x} at byte {at}")]
    Opcode { opcode: u8, at: usize },
    #[error("malformed pickle at byte {at}: {what}")]
    Malformed { at: usize, what: &'static str },
    #[error("pickle nests deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("pickle too costly to decode")]
    TooCostly,
}

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in an i64.
    BigInt,
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    /// List, tuple or set (`kind`), with its nesting depth.
    Seq(SeqKind, Vec<Value>, u32),
    /// Key-value pairs, with the nesting depth.
    Dict(Vec<(Value, Value)>, u32),
    /// `module.name`, never resolved.
    Global(String, String),
    /// A class (or callable) applied to arguments (REDUCE, NEWOBJ...), with depth.
    Object(Box<Value>, Box<Value>, u32),
}

/// The kind of a [`Value::Seq`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqKind {
    List,
    Tuple,
    Set,
}

impl Value {
    fn depth(&self) -> u32 {
        match self {
            Value::Seq(_, _, d) | Value::Dict(_, d) | Value::Object(_, _, d) => *d,
            _ => 0,
        }
    }

    /// The items of a list or tuple.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Seq(SeqKind::List | SeqKind::Tuple, v, _) => Some(v),
            _ => None,
        }
    }

    /// For an object built from a class: the class name (without module) and
    /// its arguments.
    pub fn as_object(&self) -> Option<(&str, &Value)> {
        match self {
            Value::Object(class, args, _) => match class.as_ref() {
                Value::Global(_, name) => Some((name.as_str(), args.as_ref())),
                _ => None,
            },
            _ => None,
        }
    }

    /// A Python-like, readable description, at most about `max` bytes.
    pub fn describe(&self, max: usize) -> String {
        let mut out = String::new();
        self.repr(&mut out, max);
        if out.len() > max {
            out = super::clip(out, max);
        }
        out
    }

    fn repr(&self, out: &mut String, max: usize) {
        if out.len() > max {
            return;
        }
        match self {
            Value::None => out.push_str("None"),
            Value::Bool(b) => out.push_str(if *b { "True" } else { "False" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::BigInt => out.push_str("<big int>"),
            Value::Float(f) => {
                let _ = write!(out, "{f}");
            }
            Value::Str(s) => {
                let _ = write!(out, "{s:?}");
            }
            Value::Bytes(b) => {
                let _ = write!(out, "b{:?}", String::from_utf8_lossy(b));
            }
            Value::Seq(kind, items, _) => {
                let (open, close) = match kind {
                    SeqKind::List => ('[', ']'),
                    SeqKind::Tuple => ('(', ')'),
                    SeqKind::Set => ('{', '}'),
                };
                out.push(open);
                for (i, v) in items.iter().enumerate() {
                    if out.len() > max {
                        break;
                    }
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.repr(out, max);
                }
                out.push(close);
            }
            Value::Dict(items, _) => {
                out.push('{');
                for (i, (k, v)) in items.iter().enumerate() {
                    if out.len() > max {
                        break;
                    }
                    if i > 0 {
                        out.push_str(", ");
                    }
                    k.repr(out, max);
                    out.push_str(": ");
                    v.repr(out, max);
                }
                out.push('}');
            }
            Value::Global(m, n) => {
                let _ = write!(out, "{m}.{n}");
            }
            Value::Object(class, args, _) => {
                match class.as_ref() {
                    Value::Global(_, n) => out.push_str(n),
                    other => other.repr(out, max),
                }
                match args.as_ref() {
                    Value::Seq(SeqKind::Tuple, _, _) => args.repr(out, max),
                    other => {
                        out.push('(');
                        other.repr(out, max);
                        out.push(')');
                    }
                }
            }
        }
    }

    /// A copy, charging its size to `work`.
    fn copy(&self, work: &mut usize) -> Result<Value, PickleError> {
        fn cost(v: &Value, work: &mut usize) -> Result<(), PickleError> {
            let own = match v {
                Value::Str(s) => 1 + s.len(),
                Value::Bytes(b) => 1 + b.len(),
                Value::Global(m, n) => 1 + m.len() + n.len(),
                _ => 1,
            };
            *work = work.checked_sub(own).ok_or(PickleError::TooCostly)?;
            match v {
                Value::Seq(_, items, _) => items.iter().try_for_each(|i| cost(i, work)),
                Value::Dict(items, _) => items.iter().try_for_each(|(k, v)| {
                    cost(k, work)?;
                    cost(v, work)
                }),
                Value::Object(c, a, _) => {
                    cost(c, work)?;
                    cost(a, work)
                }
                _ => Ok(()),
            }
        }
        cost(self, work)?;
        Ok(self.clone())
    }
}

const PROTO: u8 = 0x80;
const EMPTY_LIST: u8 = b']';
const MARK: u8 = b'(';
const BINUNICODE: u8 = b'X';
const APPENDS: u8 = b'e';
const STOP: u8 = b'.';

/// `["a", "b", ...]` as a protocol 2 pickle.
pub fn encode_str_list(items: &[&str]) -> Vec<u8> {
    let mut out = vec![PROTO, 2, EMPTY_LIST];
    if !items.is_empty() {
        out.push(MARK);
        for s in items {
            out.push(BINUNICODE);
            // Commands are short; a string over 4 GiB cannot occur here.
            let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out.push(APPENDS);
    }
    out.push(STOP);
    out
}

/// A decoder over one pickle.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    work: usize,
}

/// Decodes one pickle (trailing bytes after STOP are ignored).
pub fn decode(data: &[u8]) -> Result<Value, PickleError> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        work: MAX_WORK,
    }
    .run()
}

impl<'a> Machine<'a> {
    fn bad(&self, what: &'static str) -> PickleError {
        PickleError::Malformed { at: self.pos, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated(self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> Result<u64, PickleError> {
        let b = self.take(n)?;
        Ok(b.iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    fn len(&mut self, n: usize) -> Result<usize, PickleError> {
        let l = self.le(n)?;
        usize::try_from(l).map_err(|_| PickleError::Truncated(self.pos))
    }

    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let rest = &self.data[self.pos.min(self.data.len())..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(self.pos))?;
        let l = self.take(n)?;
        self.pos += 1;
        Ok(l)
    }

    fn text_line(&mut self) -> Result<String, PickleError> {
        Ok(String::from_utf8_lossy(self.line()?).into_owned())
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.bad("pop below a mark"));
        }
        self.stack.pop().ok_or_else(|| self.bad("empty stack"))
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        let at = self.pos;
        self.stack.last_mut().ok_or(PickleError::Malformed {
            at,
            what: "empty stack",
        })
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let m = self.marks.pop().ok_or_else(|| self.bad("no mark"))?;
        if m > self.stack.len() {
            return Err(self.bad("mark above the stack"));
        }
        Ok(self.stack.split_off(m))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn seq(kind: SeqKind, items: Vec<Value>) -> Result<Value, PickleError> {
        let d = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
        if d > MAX_DEPTH {
            return Err(PickleError::TooDeep);
        }
        Ok(Value::Seq(kind, items, d))
    }

    fn object(class: Value, args: Value) -> Result<Value, PickleError> {
        // `builtins.str("x")` is how fail2ban's IPAddr pickles itself (the
        // `ignoreip` reply): the string itself.
        if let Value::Global(m, n) = &class {
            if (m == "builtins" || m == "__builtin__") && n == "str" {
                if let Value::Seq(SeqKind::Tuple, items, _) = &args {
                    if let [Value::Str(x)] = &items[..] {
                        return Ok(Value::Str(x.clone()));
                    }
                }
            }
        }
        let d = class.depth().max(args.depth()) + 1;
        if d > MAX_DEPTH {
            return Err(PickleError::TooDeep);
        }
        Ok(Value::Object(Box::new(class), Box::new(args), d))
    }

    /// Adds items to the list/set on top of the stack.
    fn extend_top(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let at = self.pos;
        match self.top()? {
            Value::Seq(SeqKind::List | SeqKind::Set, v, d) => {
                for i in items {
                    let nd = (i.depth() + 1).max(*d);
                    if nd > MAX_DEPTH {
                        return Err(PickleError::TooDeep);
                    }
                    *d = nd;
                    v.push(i);
                }
                Ok(())
            }
            // Appending to an object (a list subclass): keep it as it is.
            Value::Object(..) => Ok(()),
            _ => Err(PickleError::Malformed {
                at,
                what: "append to a non-list",
            }),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        if items.len() % 2 != 0 {
            return Err(self.bad("odd number of dict items"));
        }
        let at = self.pos;
        match self.top()? {
            Value::Dict(v, d) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(val)) = (it.next(), it.next()) {
                    let nd = (k.depth().max(val.depth()) + 1).max(*d);
                    if nd > MAX_DEPTH {
                        return Err(PickleError::TooDeep);
                    }
                    *d = nd;
                    v.push((k, val));
                }
                Ok(())
            }
            Value::Object(..) => Ok(()),
            _ => Err(PickleError::Malformed {
                at,
                what: "set item of a non-dict",
            }),
        }
    }

    fn int_from_le(bytes: &[u8]) -> Value {
        if bytes.is_empty() {
            return Value::Int(0);
        }
        if bytes.len() > 8 {
            let neg = bytes.last().is_some_and(|&b| b & 0x80 != 0);
            let fill = if neg { 0xff } else { 0 };
            if bytes[8..].iter().any(|&b| b != fill) {
                return Value::BigInt;
            }
            return Self::int_from_le(&bytes[..8]);
        }
        let neg = bytes.last().is_some_and(|&b| b & 0x80 != 0);
        let mut buf = if neg { [0xff; 8] } else { [0; 8] };
        buf[..bytes.len()].copy_from_slice(bytes);
        let v = i64::from_le_bytes(buf);
        if bytes.len() == 8 && (v < 0) != neg {
            return Value::BigInt;
        }
        Value::Int(v)
    }

    fn memo_key_line(&mut self) -> Result<u64, PickleError> {
        let l = self.text_line()?;
        l.trim().parse().map_err(|_| self.bad("memo key"))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let v = self
            .stack
            .last()
            .ok_or_else(|| self.bad("empty stack"))?
            .copy(&mut self.work)?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        let v = self
            .memo
            .get(&key)
            .ok_or_else(|| self.bad("unknown memo key"))?
            .copy(&mut self.work)?;
        self.push(v);
        Ok(())
    }

    fn run(mut self) -> Result<Value, PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                STOP => return self.pop(),
                PROTO => {
                    self.u8()?;
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.take(8)?;
                }
                MARK => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self
                        .stack
                        .last()
                        .ok_or_else(|| self.bad("empty stack"))?
                        .copy(&mut self.work)?;
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = self.le(2)?;
                    self.push(Value::Int(v as i64));
                }
                b'J' => {
                    let b = self.take(4)?;
                    let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    self.push(Value::Int(i64::from(v)));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.len(1)?
                    } else {
                        self.len(4)?
                    };
                    let b = self.take(n)?;
                    self.push(Self::int_from_le(b));
                }
                b'I' | b'L' => {
                    let l = self.text_line()?;
                    let t = l.trim().trim_end_matches('L');
                    let v = match t {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => t.parse().map(Value::Int).unwrap_or(Value::BigInt),
                    };
                    self.push(v);
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'F' => {
                    let l = self.text_line()?;
                    self.push(Value::Float(l.trim().parse().unwrap_or(f64::NAN)));
                }
                b'X' | 0x8c | 0x8d | b'U' | b'T' => {
                    let n = match op {
                        0x8c | b'U' => self.len(1)?,
                        0x8d => self.len(8)?,
                        _ => self.len(4)?,
                    };
                    let b = self.take(n)?;
                    self.push(Value::Str(String::from_utf8_lossy(b).into_owned()));
                }
                b'C' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => self.len(1)?,
                        b'B' => self.len(4)?,
                        _ => self.len(8)?,
                    };
                    let b = self.take(n)?;
                    self.push(Value::Bytes(b.to_vec()));
                }
                b'V' => {
                    let l = self.text_line()?;
                    self.push(Value::Str(l));
                }
                b'S' => {
                    // A quoted Python repr; escapes are left as they are.
                    let l = self.text_line()?;
                    let t = l.trim();
                    let unquoted = ['\'', '"']
                        .iter()
                        .find_map(|&q| t.strip_prefix(q).and_then(|x| x.strip_suffix(q)))
                        .unwrap_or(t);
                    self.push(Value::Str(unquoted.to_owned()));
                }
                b']' => self.push(Value::Seq(SeqKind::List, Vec::new(), 1)),
                b')' => self.push(Value::Seq(SeqKind::Tuple, Vec::new(), 1)),
                b'}' => self.push(Value::Dict(Vec::new(), 1)),
                0x8f => self.push(Value::Seq(SeqKind::Set, Vec::new(), 1)),
                b'l' | b't' | 0x91 => {
                    let items = self.pop_mark()?;
                    let kind = match op {
                        b'l' => SeqKind::List,
                        b't' => SeqKind::Tuple,
                        _ => SeqKind::Set,
                    };
                    let v = Self::seq(kind, items)?;
                    self.push(v);
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = Self::seq(SeqKind::Tuple, items)?;
                    self.push(v);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(Vec::new(), 1));
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_top(vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.extend_top(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'p' => {
                    let k = self.memo_key_line()?;
                    self.memo_put(k)?;
                }
                b'q' => {
                    let k = self.le(1)?;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.le(4)?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'g' => {
                    let k = self.memo_key_line()?;
                    self.memo_get(k)?;
                }
                b'h' => {
                    let k = self.le(1)?;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.le(4)?;
                    self.memo_get(k)?;
                }
                b'c' => {
                    let m = self.text_line()?;
                    let n = self.text_line()?;
                    self.push(Value::Global(m, n));
                }
                0x93 => {
                    let n = self.pop()?;
                    let m = self.pop()?;
                    let text = |v: Value| match v {
                        Value::Str(s) => s,
                        other => other.describe(64),
                    };
                    self.push(Value::Global(text(m), text(n)));
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let v = Self::object(class, args)?;
                    self.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let v = Self::object(class, args)?;
                    self.push(v);
                }
                b'b' => {
                    // BUILD: object state; not needed for a description.
                    self.pop()?;
                    self.top()?;
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err(self.bad("OBJ without class"));
                    }
                    let class = items.remove(0);
                    let args = Self::seq(SeqKind::Tuple, items)?;
                    let v = Self::object(class, args)?;
                    self.push(v);
                }
                b'i' => {
                    let m = self.text_line()?;
                    let n = self.text_line()?;
                    let items = self.pop_mark()?;
                    let args = Self::seq(SeqKind::Tuple, items)?;
                    let v = Self::object(Value::Global(m, n), args)?;
                    self.push(v);
                }
                _ => return Err(PickleError::Opcode { opcode: op, at }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes produced by Python 3.11 `pickle.dumps(x, 5)` (what fail2ban-server 1.0.2
    /// sends).
    const UNKNOWN_JAIL: &[u8] = b"\x80\x05\x95A\x00\x00\x00\x00\x00\x00\x00K\x01\x8c\x13fail2ban.exceptions\x94\x8c\x14UnknownJailException\x94\x93\x94\x8c\x06nojail\x94\x85\x94R\x94\x86\x94.";
    const NOT_BANNED: &[u8] = b"\x80\x05\x95<\x00\x00\x00\x00\x00\x00\x00K\x01\x8c\x08builtins\x94\x8c\tException\x94\x93\x94\x8c\x17not banned: ['1.2.3.4']\x94\x85\x94R\x94\x86\x94.";
    const LIST: &[u8] = b"\x80\x05\x95\x19\x00\x00\x00\x00\x00\x00\x00K\x00]\x94(\x8c\x071.2.3.4\x94\x8c\x03::1\x94e\x86\x94.";
    /// `(0, [IPAddr('192.0.2.0/24'), IPAddr('localhost')])`: IPAddr pickles as
    /// `builtins.str(...)`.
    const IPADDRS: &[u8] = b"\x80\x05\x95\x7f\x00\x00\x00\x00\x00\x00\x00K\x00]\x94(\x8c\x08builtins\x94\x8c\x03str\x94\x93\x94\x8c\x0c192.0.2.0/24\x94\x85\x94R\x94h\x03\x8c\tlocalhost\x94\x85\x94R\x94e\x86\x94.";
    const COUNT: &[u8] = b"\x80\x05\x95\x07\x00\x00\x00\x00\x00\x00\x00K\x00K\x03\x86\x94.";

    fn s(x: &str) -> Value {
        Value::Str(x.to_owned())
    }

    #[test]
    fn encodes_like_python_protocol_2() {
        // pickle.dumps(['set','cluster','banip','1.2.3.4'], 2) but with BINUNICODE
        // and without memo opcodes.
        let b = encode_str_list(&["set", "cluster", "banip", "1.2.3.4"]);
        assert_eq!(
            b,
            b"\x80\x02](X\x03\x00\x00\x00setX\x07\x00\x00\x00clusterX\x05\x00\x00\x00banipX\x07\x00\x00\x001.2.3.4e."
        );
        let back = decode(&b).unwrap();
        assert_eq!(
            back.as_seq().unwrap(),
            &[s("set"), s("cluster"), s("banip"), s("1.2.3.4")]
        );
        assert_eq!(
            decode(&encode_str_list(&[])).unwrap().as_seq(),
            Some(&[][..])
        );
    }

    #[test]
    fn decodes_fail2ban_replies() {
        let v = decode(COUNT).unwrap();
        assert_eq!(v.as_seq().unwrap(), &[Value::Int(0), Value::Int(3)]);
        let v = decode(LIST).unwrap();
        let t = v.as_seq().unwrap();
        assert_eq!(t[1].as_seq().unwrap(), &[s("1.2.3.4"), s("::1")]);
        let v = decode(IPADDRS).unwrap();
        let t = v.as_seq().unwrap();
        assert_eq!(t[1].as_seq().unwrap(), &[s("192.0.2.0/24"), s("localhost")]);
        let v = decode(UNKNOWN_JAIL).unwrap();
        let t = v.as_seq().unwrap();
        assert_eq!(t[0], Value::Int(1));
        let (class, args) = t[1].as_object().unwrap();
        assert_eq!(class, "UnknownJailException");
        assert_eq!(args.as_seq().unwrap(), &[s("nojail")]);
        let v = decode(NOT_BANNED).unwrap();
        assert_eq!(
            v.as_seq().unwrap()[1].describe(100),
            "Exception(\"not banned: ['1.2.3.4']\")"
        );
    }

    #[test]
    fn decodes_ints_and_old_opcodes() {
        assert_eq!(decode(b"\x8a\x02\xff\xff.").unwrap(), Value::Int(-1));
        assert_eq!(decode(b"\x8a\x00.").unwrap(), Value::Int(0));
        assert_eq!(
            decode(b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.").unwrap(),
            Value::BigInt
        );
        assert_eq!(decode(b"J\xff\xff\xff\xff.").unwrap(), Value::Int(-1));
        assert_eq!(decode(b"I42\n.").unwrap(), Value::Int(42));
        let v = decode(b"(lp0\nVa\np1\nag1\na.").unwrap();
        assert_eq!(v.as_seq().unwrap(), &[s("a"), s("a")]);
        let v = decode(b"cbuiltins\nKeyError\n(S'x'\ntR.").unwrap();
        assert_eq!(v.describe(100), "KeyError(\"x\")");
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        assert!(decode(b"").is_err());
        assert!(decode(b".").is_err());
        assert!(decode(b"\x80").is_err());
        assert!(decode(b"X\xff\xff\xff\xff").is_err());
        assert!(decode(b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff").is_err());
        assert!(decode(b"a.").is_err());
        assert!(decode(b"(e.").is_err());
        assert!(decode(b"h\x05.").is_err());
        // Deep nesting is refused.
        let mut deep = vec![b']'; 1000];
        deep.extend(std::iter::repeat_n(b'a', 999));
        deep.push(b'.');
        assert_eq!(decode(&deep), Err(PickleError::TooDeep));
        // Memo copies are bounded: a list that doubles at each step.
        let mut bomb = b"]K\x01a\x94".to_vec();
        for i in 0..40u8 {
            bomb.extend_from_slice(&[b'(', b'h', i, b'h', i, b'l', 0x94]);
        }
        bomb.push(b'.');
        assert_eq!(decode(&bomb), Err(PickleError::TooCostly));
    }

    /// Random and mutated bytes never panic.
    #[test]
    fn fuzz_never_panics() {
        let seeds: [&[u8]; 5] = [UNKNOWN_JAIL, NOT_BANNED, LIST, COUNT, IPADDRS];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000 {
            let mut b: Vec<u8> = if round % 4 == 0 {
                let n = (next() % 64) as usize;
                (0..n).map(|_| next() as u8).collect()
            } else {
                seeds[round % seeds.len()].to_vec()
            };
            let edits = 1 + next() % 4;
            for _ in 0..edits {
                if b.is_empty() {
                    break;
                }
                let i = (next() as usize) % b.len();
                match next() % 3 {
                    0 => b[i] = next() as u8,
                    1 => {
                        b.remove(i);
                    }
                    _ => b.insert(i, next() as u8),
                }
            }
            if let Ok(v) = decode(&b) {
                let _ = v.describe(200);
            }
        }
    }
}
