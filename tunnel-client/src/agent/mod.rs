//! The device agent: keeps the tunnel up, renews the certificate, heals itself.
