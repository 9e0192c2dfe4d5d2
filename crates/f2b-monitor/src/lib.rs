//! f2b-monitor
