//! The socket: its mode, a stale socket, and serving until shutdown.

use super::*;

// === the socket ===

#[tokio::test]
async fn the_socket_is_open_to_all_and_replaces_a_stale_one() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a").join("b").join("api.sock");
    let listener = super::bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777);
    assert!(path.parent().unwrap().is_dir());

    // A live socket is not taken over.
    let err = super::bind(&path).unwrap_err();
    assert!(matches!(err, super::BindError::InUse { .. }), "{err}");
    // A stale one (nobody listening) is replaced.
    drop(listener);
    assert!(path.exists());
    super::bind(&path).unwrap();

    // Something else at the path is left alone.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"data").unwrap();
    let err = super::bind(&file).unwrap_err();
    assert!(matches!(err, super::BindError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
}

#[tokio::test]
async fn serve_listens_on_the_path_and_stops_on_shutdown() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let (_tx, rx) = watch::channel(ca.snapshot(vec![ca.identity("/web", &own_selectors(), "")], 1));
    let (stop, stopped) = oneshot::channel::<()>();
    // Once bound, the socket accepts connections, even before serving starts.
    let listener = super::bind(&path).unwrap();
    let task = {
        let path = path.clone();
        tokio::spawn(async move {
            super::serve_on(listener, &path, rx, Arc::default(), async move {
                let _ = stopped.await;
            })
            .await
        })
    };
    let mut client = client::connect(&path).await.unwrap();
    let response = next_x509(&mut open_x509(&mut client).await).await;
    assert_eq!(response.svids[0].spiffe_id, "spiffe://example.org/web");

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(!path.exists());
}
