//! Warren's own test application: an HTTP echo server (`warren-echo`) and a load client
//! (`warren-load`). The binaries are thin wrappers around [`echo::serve`] and [`load::run`], so
//! tests and other crates can run both in-process and parse the same JSON the tools print.

pub mod echo;
pub mod load;
