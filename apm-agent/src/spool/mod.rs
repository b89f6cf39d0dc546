//! The disk spool: segment files of checksummed records.
