//! Circuit breaker (closed / open / half-open) in front of the central listener.
