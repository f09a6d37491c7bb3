//! The simulated Xen (to be written).
