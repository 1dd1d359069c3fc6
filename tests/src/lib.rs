//! End-to-end tests with real `agent` processes.
