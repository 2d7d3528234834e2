//! End-to-end test harness (placeholder until the control plane lands, issue 6).
