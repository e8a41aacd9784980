//! elb-quorum: restart an EC2 instance's supervisord programs without taking its load-balanced
//! cluster below quorum. The binary (`main.rs`) wires these modules; tests and benchmarks use them.

#[cfg(feature = "testing")]
pub mod campaign;
pub mod cli;
pub mod clock;
pub mod config;
pub mod cycle;
#[cfg(feature = "testing")]
pub mod fake;
pub mod hooks;
pub mod identity;
pub mod lb;
pub mod lease;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod quorum;
pub mod secret;
pub mod supervisor;
pub mod trigger;
pub mod worker;
