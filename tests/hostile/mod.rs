//! Attacks by hostile plugins, each driven the way a user would meet it (mostly through the real
//! CLI), each closed: see issue 13.

mod runs;
mod metrics;
mod exporter_folders;
mod time_budget;
