//! Streaming through the gateway. Alone in its test binary, so that the peak memory it
//! measures is its own.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use orcheo_gateway::body;

#[tokio::test]
async fn large_bodies_stream_both_ways_with_flat_memory() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 16 * 1024; // 1 GiB each way
    let up = upstream(|req: Request<Incoming>| async move {
        if req.method() == http::Method::POST {
            let mut body = req.into_body();
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    total += data.len();
                }
            }
            Response::new(body::full(total.to_string()))
        } else {
            Response::new(
                Generated::new(CHUNK, CHUNKS)
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
        }
    })
    .await;
    let gw = gateway(&yaml(&up.url(), "routes:\n  - {name: all, path: '/**'}\n")).await;
    let before = peak_rss();

    let upload = Request::post("/upload")
        .header("host", "gw")
        .body(Generated::new(CHUNK, CHUNKS))
        .unwrap();
    let (status, _, body) = collect(send(gw.http, upload).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, (CHUNK * CHUNKS).to_string());

    let download = send(
        gw.http,
        Request::get("/download")
            .header("host", "gw")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(download.status(), StatusCode::OK);
    let mut body = download.into_body();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len();
        }
    }
    assert_eq!(total, CHUNK * CHUNKS);
    let grown = peak_rss().saturating_sub(before);
    eprintln!(
        "peak memory grew by {} KiB while streaming 1 GiB each way",
        grown >> 10
    );
    assert!(
        grown < 64 * 1024 * 1024,
        "peak memory grew by {} MiB for 1 GiB each way",
        grown >> 20
    );
}
