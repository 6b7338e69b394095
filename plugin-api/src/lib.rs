//! What an ftx plugin author depends on: the version of the `ftx:plugin` WIT package this
//! SDK speaks. Guest bindings and the native ABI build on it.

/// Major version of the `ftx:plugin` interface; the host accepts guests of the same major.
pub const API_MAJOR: u32 = 0;
