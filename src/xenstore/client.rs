//! xenstore client (to be written).

/// A xenstore connection.
pub struct XsClient {}
