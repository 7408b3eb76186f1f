//! The admin listener: health, readiness and metrics.

mod common;

use common::*;
use http::StatusCode;

#[tokio::test]
async fn health_readiness_and_metrics() {
    let (gw, _up) = echo_gateway("").await;
    let (status, _, body) = get(gw.admin, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["status"], "ok");

    let (status, headers, body) = get(gw.admin, "/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    let ready = json(&body);
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["listeners"]["ok"], true);

    assert_eq!(get(gw.http, "/some/path").await.0, StatusCode::OK);
    let metrics = gw.metrics().await;
    for name in [
        "orcheo_gateway_requests_total{method=\"GET\",route=\"all\",status=\"200\"} 1",
        "orcheo_gateway_request_duration_seconds_count{route=\"all\"} 1",
        "orcheo_gateway_upstream_duration_seconds_count{upstream=\"default\"} 1",
        "orcheo_gateway_config_reloads_total{result=\"success\"} 0",
        "orcheo_gateway_build_info{version=\"",
        "orcheo_gateway_open_connections ",
    ] {
        assert!(metrics.contains(name), "missing {name}:\n{metrics}");
    }
    assert!(
        !metrics.contains("/some/path"),
        "raw paths never become labels"
    );

    let (status, headers, body) = get(gw.admin, "/nothing-here").await;
    assert_error(
        status,
        &headers,
        &body,
        StatusCode::NOT_FOUND,
        "route.not_found",
        "No route for this request",
    );

    gw.gateway().shared().set_draining();
    let (status, _, body) = get(gw.admin, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let ready = json(&body);
    assert_eq!(ready["status"], "not_ready");
    assert_eq!(ready["checks"]["shutdown"]["ok"], false);
}
