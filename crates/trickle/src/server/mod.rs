//! TODO(owner): the trickle server.
