//! Who is who: the fleet's certificate authorities ([`pki`]), the master key that seals
//! secrets at rest ([`master_key`]), enrollment with one-time tokens ([`enrollment`]),
//! revocation that takes effect at once ([`revocation`]), and TLS for every port ([`tls`]).

pub mod enrollment;
pub mod master_key;
pub mod pki;
pub mod revocation;
pub mod tls;
