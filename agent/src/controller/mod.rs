//! The controller: GPU-aware hold-back, quotas per plan, anomaly responses.

pub mod anomaly;
pub mod control_loop;
pub mod gpu;
pub mod pressure;
pub mod quota;
