//! Supported names per registry kind (filled by the config work).
