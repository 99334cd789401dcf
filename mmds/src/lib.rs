//! `kiln-mmds`: the microVM metadata service (MMDS), Firecracker's per-VM metadata store that the
//! guest reads over HTTP at a link-local address (169.254.169.254 unless configured otherwise).
//!
//! This room owns the metadata service, from the host's store to the guest's TCP connections:
//! - [`Mmds`] ([`data_store`]): the JSON document the host sets with `PUT`/`PATCH /mmds`, its size
//!   limit, and how a path in it is answered (JSON or EC2's IMDS text form);
//! - [`TokenAuthority`] ([`token`]): MMDS V2's session tokens, stateless (an expiry time signed
//!   with a per-VM key), so a guest asking for many costs nothing to remember;
//! - [`respond`] ([`http`]): the guest's HTTP request bytes to the answer's bytes, with V1 and V2
//!   rules (methods, token headers, `Accept`).
//!
//! - [`MmdsStack`] ([`stack`]): the MMDS's end of the guest's network, Ethernet frames in and out
//!   of a smoltcp TCP/IP stack that calls [`respond`] with each complete request; `kiln-vmm`
//!   makes it the frame hook of each network device `mmds/config` names, and shares one [`Mmds`]
//!   between those and the API.
//!
//! It calls `serde_json`, `httparse`, `hmac`/`sha2` for the tokens and `smoltcp`.

pub mod data_store;
pub mod http;
pub mod stack;
pub mod token;

pub use data_store::{Mmds, MmdsError, MmdsVersion, OutputFormat};
pub use http::{HttpResponse, request_len, respond};
pub use stack::MmdsStack;
pub use token::{TokenAuthority, TokenError};
