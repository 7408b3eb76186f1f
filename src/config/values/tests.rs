use std::time::Duration;

use super::*;

#[test]
fn durations_in_every_accepted_form() {
    let cases: [(&str, Duration); 7] = [
        ("5", Duration::from_secs(5)),
        ("2.5", Duration::from_millis(2500)),
        ("500ms", Duration::from_millis(500)),
        ("30s", Duration::from_secs(30)),
        ("5m", Duration::from_secs(300)),
        ("1h", Duration::from_secs(3600)),
        (" 10s ", Duration::from_secs(10)),
    ];
    for (text, expected) in cases {
        assert_eq!(text.parse::<Dur>().unwrap().get(), expected, "{text}");
    }
    let yaml: Vec<Dur> = serde_yaml::from_str("[5, 2.5, '500ms', 1m]").unwrap();
    assert_eq!(yaml[1].get(), Duration::from_millis(2500));
    assert_eq!(yaml[3].get(), Duration::from_secs(60));
    for bad in ["", "fast", "5 days", "-1", "1e400", "5d"] {
        assert!(bad.parse::<Dur>().is_err(), "{bad}");
    }
    assert!(serde_yaml::from_str::<Dur>("-3").is_err());
}

#[test]
fn sizes_in_every_accepted_form() {
    for (text, bytes) in [
        ("1024", 1024),
        ("32KiB", 32768),
        ("16MiB", 16 << 20),
        ("1GiB", 1 << 30),
        ("512B", 512),
    ] {
        assert_eq!(text.parse::<ByteSize>().unwrap().0, bytes, "{text}");
    }
    for bad in ["", "lots", "1.5MiB", "3TiB", "99999999999999999999"] {
        assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
    }
}

#[test]
fn lists_from_text_yaml_and_json() {
    assert_eq!(parse_list("a, b c,,d").unwrap(), vec!["a", "b", "c", "d"]);
    assert_eq!(parse_list(r#"["x", " y ", ""]"#).unwrap(), vec!["x", "y"]);
    assert!(parse_list("[1, 2]").is_err());
    assert!(parse_list("[oops").is_err());
    let list: StrList = serde_yaml::from_str("[RS256, ' HS256 ']").unwrap();
    assert_eq!(list.0, vec!["RS256", "HS256"]);
    let list: StrList = serde_yaml::from_str("'RS256 HS256'").unwrap();
    assert_eq!(list.0, vec!["RS256", "HS256"]);
}

#[test]
fn secrets_never_print() {
    let secret = Secret::new("hunter2");
    assert_eq!(format!("{secret:?}"), REDACTED);
    assert_eq!(
        serde_json::to_string(&secret).unwrap(),
        format!("\"{REDACTED}\"")
    );
    assert_eq!(secret.expose(), "hunter2");
    let url = SecretUrl::new("postgres://app:s3cret@db:5432/orcheo");
    assert_eq!(
        url.redacted(),
        format!("postgres://app:{REDACTED}@db:5432/orcheo")
    );
    assert!(!format!("{url:?}").contains("s3cret"));
    assert_eq!(
        redact_url_password("redis://127.0.0.1:6379/0"),
        "redis://127.0.0.1:6379/0"
    );
    assert_eq!(
        redact_url_password("host=db user=app password=s3cret dbname=x"),
        format!("host=db user=app password={REDACTED} dbname=x")
    );
}

#[test]
fn cidrs_and_single_addresses() {
    let net: Cidr = "10.0.0.0/8".parse().unwrap();
    assert!(net.contains("10.1.2.3".parse().unwrap()));
    assert!(
        net.contains("::ffff:10.1.2.3".parse().unwrap()),
        "IPv4-mapped counts as IPv4"
    );
    assert!(!net.contains("11.0.0.1".parse().unwrap()));
    let host: Cidr = "192.0.2.7".parse().unwrap();
    assert!(host.contains("192.0.2.7".parse().unwrap()));
    assert!(!host.contains("192.0.2.8".parse().unwrap()));
    let v6: Cidr = "2001:db8::/32".parse().unwrap();
    assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
    assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    assert!("example.com".parse::<Cidr>().is_err());
}

#[test]
fn booleans() {
    for t in ["true", "1", "YES", "on"] {
        assert_eq!(parse_bool(t), Ok(true));
    }
    for f in ["false", "0", "no", "Off"] {
        assert_eq!(parse_bool(f), Ok(false));
    }
    assert!(parse_bool("maybe").is_err());
}
