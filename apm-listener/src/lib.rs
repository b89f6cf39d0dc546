//! The reference central listener.
