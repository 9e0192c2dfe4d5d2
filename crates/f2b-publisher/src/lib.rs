//! f2b-publisher
