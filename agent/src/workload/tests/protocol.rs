//! The protocol around the calls: the security header, the JWT and WIT
//! RPCs this agent does not serve, and clients that send the socket path as
//! `:authority`.

use super::*;

// === the security header ===

#[tokio::test]
async fn calls_without_the_security_header_are_invalid() {
    let ca = Ca::new();
    let server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let mut bare = SpiffeWorkloadApiClient::new(
        sigil::transport::unix_channel(&server.socket)
            .await
            .unwrap(),
    );

    let status = bare.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, MISSING_HEADER);
    let status = bare
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, MISSING_HEADER);
    let status = bare
        .fetch_jwtsvid(JwtsvidRequest::default())
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, MISSING_HEADER);

    let mut request = tonic::Request::new(X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "false".parse().unwrap());
    let status = bare.fetch_x509svid(request).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, MISSING_HEADER);
}

// === JWT and WIT ===

#[tokio::test]
async fn jwt_and_wit_rpcs_are_unimplemented() {
    let ca = Ca::new();
    let server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let mut client = server.client().await;

    let status = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::Unimplemented, JWT_UNSUPPORTED);
    let status = client
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap_err();
    assert_status(&status, Code::Unimplemented, JWT_UNSUPPORTED);
    let status = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: "a.b.c".into(),
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::Unimplemented, JWT_UNSUPPORTED);
    let status = client
        .fetch_witsvid(WitsvidRequest::default())
        .await
        .unwrap_err();
    assert_status(&status, Code::Unimplemented, WIT_UNSUPPORTED);
    let status = client
        .fetch_wit_bundles(WitBundlesRequest {})
        .await
        .unwrap_err();
    assert_status(&status, Code::Unimplemented, WIT_UNSUPPORTED);
}

// === clients that send the socket path as authority ===

/// Frames an HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// gRPC C-core (grpcio, so py-spiffe) sends the percent-encoded socket
/// path as `:authority` over a Unix socket, which is no valid URI
/// authority; such a call must still be served.
#[tokio::test]
async fn a_call_with_the_socket_path_as_authority_is_served() {
    use prost::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ca = Ca::new();
    let server = start(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1)).await;
    let mut conn = tokio::net::UnixStream::connect(&server.socket)
        .await
        .unwrap();

    // The header block as grpcio 1.85 writes it: HPACK literals with
    // incremental indexing and plain strings, after `:method: POST` and
    // `:scheme: http` from the static table.
    let mut block = vec![0x83, 0x86];
    for (name, value) in [
        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
        (":authority", "tmp%2Fagent.sock"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("workload.spiffe.io", "true"),
    ] {
        block.push(0x40);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let request = [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        h2_frame(0x4, 0, 0, &[]),
        h2_frame(0x1, 0x4, 1, &block),
        // An empty X509SVIDRequest: not compressed, length 0.
        h2_frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]),
    ]
    .concat();
    conn.write_all(&request).await.unwrap();

    let message = loop {
        let mut header = [0u8; 9];
        conn.read_exact(&mut header).await.unwrap();
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await.unwrap();
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
        match header[3] {
            0x3 => panic!("stream {stream} was reset: {payload:?}"),
            0x7 => panic!("the connection was closed: {payload:?}"),
            0x4 if header[4] & 0x1 == 0 => {
                conn.write_all(&h2_frame(0x4, 0x1, 0, &[])).await.unwrap();
            }
            0x0 if stream == 1 => break payload,
            _ => {}
        }
    };
    assert_eq!(message[0], 0, "not compressed");
    let response = X509svidResponse::decode(&message[5..]).unwrap();
    assert_eq!(response.svids[0].spiffe_id, "spiffe://example.org/web");
}
