//! f2b-subscriber
