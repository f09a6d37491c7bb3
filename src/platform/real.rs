//! The real Xen platform (to be written).
