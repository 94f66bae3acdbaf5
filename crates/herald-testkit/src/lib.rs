//! Real servers for Herald's tests, started on free loopback ports and
//! stopped when dropped, also when a test fails.
//!
//! The programs come from `scripts/install-tools.sh` (`make tools`), which
//! installs pinned versions into `$HERALD_TOOLS` (default
//! `~/.cache/herald-tools`). A missing program fails the test with a message
//! that says how to install it; nothing here skips.

mod cluster;
mod cluster_nats;
mod cluster_sinks;
mod control_plane;
mod image_runner;
mod images;
mod jaeger;
mod mailpit;
mod nats;
mod nats_tls;
mod process;
mod receiver;
mod receiver_control;
mod tools;
mod verify;
mod wait;

pub use cluster::{Cluster, NODE_NAME, TEST_POD_IMAGE};
pub use cluster_nats::{
    IMAGE_USER, LOCAL_STORAGE_CLASS, local_volumes, nats_chart, nats_chart_values,
};
pub use cluster_sinks::{MAILPIT_SERVICE, RECEIVER_SERVICE, sinks_manifest};
pub use control_plane::ControlPlane;
pub use image_runner::{ImageRunner, RunOptions};
pub use images::{Image, Images, dockerfile, images_dir};
pub use jaeger::{Jaeger, span_count};
pub use mailpit::{MailMessage, Mailpit};
pub use nats::{NatsServer, include_path};
pub use nats_tls::TestPki;
pub use receiver::{ReceivedWebhook, ReceiverBehaviour, TestReceiver};
pub use receiver_control::{CONTROL_PREFIX, RemoteReceiver};
pub use tools::{free_port, http_client, tool, tools_dir, workspace_root};
pub use verify::verify_with_standardwebhooks;
pub use wait::wait_until;
