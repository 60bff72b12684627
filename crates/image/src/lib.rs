//! OCI images for ampoule pools.
//!
//! - [`Store`]: the content store under `<data_dir>/images` — blobs named by their verified
//!   digest (each layer once, whichever images share it), a name index, and one unpacked root
//!   per image that sandboxes mount read-only and never write.
//! - [`import`]: an OCI image layout directory or a `docker save` archive into the store.
//! - [`registry`]: the OCI distribution protocol's pull side (anonymous or with credentials,
//!   HTTPS, or plain HTTP to a loopback registry when asked).
//! - [`unpack`]: the layer unpacker, which cannot write outside its root (see its invariants).
//!
//! Safe Rust only: every descriptor-relative call goes through `nix`.

mod digest;
mod error;
pub mod import;
mod name;
pub mod oci;
pub mod registry;
mod store;
pub mod unpack;

pub use digest::Digest;
pub use error::{Error, Result};
pub use name::{ImageName, Reference, Target};
pub use store::{BlobWriter, Image, Lock, Removed, Store};
pub use unpack::{Limits, Report};
