//! Droplets: made, labelled and deleted, with their enrollment tokens.
