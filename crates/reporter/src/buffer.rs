//! The buffer between the writer thread and the sender: the shared disk spool with a memory
//! fallback ([`spool::fallback`]).

pub(crate) use spool::fallback::{Batch, Buffer, Item, Source};
