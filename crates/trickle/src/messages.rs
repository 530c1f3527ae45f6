//! TODO(owner): see the crate docs.
