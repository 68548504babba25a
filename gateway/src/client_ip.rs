//! Who the client is, as the upstream is told: the peer's address, or — when the peer is a proxy the
//! operator trusts (`trusted_proxies`) — the nearest address in `X-Forwarded-For` that is not one.

use std::{fmt, net::IpAddr, str::FromStr};

use http::HeaderMap;
use serde::Deserialize;

/// Most `X-Forwarded-For` entries kept from a trusted proxy; a longer chain keeps its last ones.
const MAX_CHAIN: usize = 16;

/// A block of addresses: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Tells whether `address` is inside the block (an IPv4-mapped IPv6 address counts as its IPv4 form).
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not an IP address or CIDR block"))?;
        let network = network.to_canonical();
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= width)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0 to {width}"))?,
        };
        Ok(Self { network, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.network, self.prefix)
    }
}

/// The client as the gateway determined it, and the `X-Forwarded-For` value to send upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAddress {
    /// The client's address: the peer, or the nearest untrusted hop a trusted proxy reported.
    pub client: IpAddr,
    /// The chain to forward: the trusted proxies' entries followed by the peer, or the peer alone.
    pub forwarded_for: String,
}

/// Returns who the client is. A request from an untrusted peer (or with no proxies trusted) is from the
/// peer, whatever its headers say; from a trusted proxy, `X-Forwarded-For` is read right to left and the
/// first address outside `trusted` is the client (an entry that is not an address ends the walk).
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> ClientAddress {
    let peer = peer.to_canonical();
    if !trusted.iter().any(|block| block.contains(peer)) {
        return ClientAddress {
            client: peer,
            forwarded_for: peer.to_string(),
        };
    }
    let entries: Vec<&str> = headers
        .get_all(crate::headers::FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .collect();
    let kept = &entries[entries.len().saturating_sub(MAX_CHAIN)..];
    let mut client = peer;
    for entry in kept.iter().rev() {
        let Ok(address) = entry.parse::<IpAddr>() else {
            break;
        };
        client = address.to_canonical();
        if !trusted.iter().any(|block| block.contains(client)) {
            break;
        }
    }
    let mut forwarded_for: Vec<String> = kept
        .iter()
        .filter_map(|entry| entry.parse::<IpAddr>().ok())
        .map(|address| address.to_string())
        .collect();
    forwarded_for.push(peer.to_string());
    ClientAddress {
        client,
        forwarded_for: forwarded_for.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn cidrs(blocks: &[&str]) -> Vec<Cidr> {
        blocks
            .iter()
            .map(|block| block.parse().expect("cidr"))
            .collect()
    }

    fn forwarded(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            crate::headers::FORWARDED_FOR,
            HeaderValue::from_str(value).expect("value"),
        );
        headers
    }

    #[test]
    fn blocks_contain_their_addresses_and_nothing_else() {
        let private = Cidr::from_str("10.0.0.0/8").expect("cidr");
        let single = Cidr::from_str("192.0.2.7").expect("cidr");
        let v6 = Cidr::from_str("2001:db8::/32").expect("cidr");

        assert!(private.contains("10.200.1.1".parse().expect("ip")));
        assert!(private.contains("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(!private.contains("11.0.0.1".parse().expect("ip")));
        assert!(single.contains("192.0.2.7".parse().expect("ip")));
        assert!(!single.contains("192.0.2.8".parse().expect("ip")));
        assert!(v6.contains("2001:db8:1::1".parse().expect("ip")));
        assert!(!v6.contains("10.0.0.1".parse().expect("ip")));
        assert!(
            Cidr::from_str("0.0.0.0/0")
                .expect("cidr")
                .contains("8.8.8.8".parse().expect("ip"))
        );
        assert!(Cidr::from_str("10.0.0.0/33").is_err());
        assert!(Cidr::from_str("example.com").is_err());
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let peer: IpAddr = "203.0.113.9".parse().expect("ip");

        let address = client_address(peer, &forwarded("1.2.3.4"), &cidrs(&["10.0.0.0/8"]));

        assert_eq!(address.client, peer);
        assert_eq!(address.forwarded_for, "203.0.113.9");
    }

    #[test]
    fn behind_trusted_proxies_the_nearest_untrusted_hop_is_the_client() {
        let proxy: IpAddr = "10.0.0.2".parse().expect("ip");
        let trusted = cidrs(&["10.0.0.0/8"]);

        let address = client_address(
            proxy,
            &forwarded("6.6.6.6, 198.51.100.4, 10.0.0.9"),
            &trusted,
        );
        let garbage = client_address(proxy, &forwarded("198.51.100.4, not-an-ip"), &trusted);

        assert_eq!(
            address.client,
            "198.51.100.4".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            address.forwarded_for,
            "6.6.6.6, 198.51.100.4, 10.0.0.9, 10.0.0.2"
        );
        assert_eq!(garbage.client, proxy);
        assert_eq!(garbage.forwarded_for, "198.51.100.4, 10.0.0.2");
    }
}
