//! File attacks and limits: uploads over the limit leave nothing behind; traversal and
//! absolute paths are refused; links planted by sandboxed code are never followed.

use super::*;

#[tokio::test]
async fn uploads_over_the_limit_answer_413_and_leave_nothing() {
    let h = harness_with("[server]\nmax_upload_mib = 1\n[pools.python]\nwarm = 0\n");
    let base = format!("identifier=big-0001&{V1}");
    h.exec("", "big-0001", A, "1").await;
    let big = multipart("bb", "big.bin", &vec![1u8; 2 * 1024 * 1024]);
    // Announced length: refused before reading.
    let r = h
        .upload(
            &format!("/files/upload?{base}"),
            A,
            "multipart/form-data; boundary=bb",
            big.clone(),
        )
        .await;
    assert_aca_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge");
    // Chunked: refused while streaming, with the content type lying too.
    let chunks = || -> Vec<Result<Vec<u8>, std::io::Error>> {
        big.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect()
    };
    for ct in ["multipart/form-data; boundary=bb", "application/json"] {
        let req = Request::builder()
            .method("POST")
            .uri(format!("/files/upload?{base}"))
            .header("authorization", format!("Bearer {A}"))
            .header("content-type", ct)
            .body(Body::from_stream(futures_util::stream::iter(chunks())))
            .unwrap();
        let r = h.send(req).await;
        assert_aca_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge");
    }
    // Native raw upload, chunked.
    let s = h
        .json("POST", "/v1/sessions", A, json!({"identifier": "big-0001"}))
        .await
        .json();
    let id = s["id"].as_str().unwrap();
    let req = Request::builder()
        .method("PUT")
        .uri(format!("/v1/sessions/{id}/files/raw.bin"))
        .header("authorization", format!("Bearer {A}"))
        .body(Body::from_stream(futures_util::stream::iter(chunks())))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "payload_too_large");
    let list = h
        .call("GET", &format!("/files?{base}"), Some(A), Body::empty())
        .await
        .json();
    assert_eq!(list["value"], json!([]), "a partial upload was left behind");
    let dir = h.root.path();
    let leftovers: Vec<_> = walk(dir).into_iter().filter(|p| p.is_file()).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[tokio::test]
async fn traversal_and_absolute_paths_are_refused() {
    let h = harness();
    let base = format!("identifier=trav-0001&{V1}");
    for name in [
        "../escape.txt",
        "/etc/passwd",
        "a/../../escape.txt",
        "/mnt/data/../../etc/x",
    ] {
        let r = h
            .upload(
                &format!("/files/upload?{base}"),
                A,
                "multipart/form-data; boundary=t",
                multipart("t", name, b"x"),
            )
            .await;
        assert_aca_error(
            &r,
            StatusCode::BAD_REQUEST,
            "SessionRequestValidationFailed",
        );
    }
    for path in [
        "/files/content/..%2F..%2F..%2Fetc%2Fpasswd",
        "/files/content/../../etc/passwd",
        "/files/content/%2Fetc%2Fpasswd",
        "/files/content/a%00b",
    ] {
        let r = h
            .call("GET", &format!("{path}?{base}"), Some(A), Body::empty())
            .await;
        assert!(
            r.status == StatusCode::BAD_REQUEST || r.status == StatusCode::NOT_FOUND,
            "{path}: {}",
            r.status
        );
        assert!(
            !String::from_utf8_lossy(&r.body).contains("root:"),
            "{path}"
        );
    }
    let s = h
        .json(
            "POST",
            "/v1/sessions",
            A,
            json!({"identifier": "trav-0001"}),
        )
        .await
        .json();
    let id = s["id"].as_str().unwrap();
    for path in ["..%2Fx", "%2Fetc%2Fpasswd", "a/..%2F..%2Fx"] {
        let r = h
            .call(
                "PUT",
                &format!("/v1/sessions/{id}/files/{path}"),
                Some(A),
                Body::from("x"),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(r.code(), "invalid_path");
        let r = h
            .call(
                "GET",
                &format!("/v1/sessions/{id}/files/{path}/content"),
                Some(A),
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
    }
    assert!(!h.root.path().join("x").exists());
}

#[tokio::test]
async fn links_planted_by_sandboxed_code_are_never_followed() {
    let h = harness();
    let base = format!("identifier=link-0001&{V1}");
    let marker = "marker-link-0001";
    h.upload(
        &format!("/files/upload?{base}"),
        A,
        "multipart/form-data; boundary=m",
        multipart("m", marker, b"m"),
    )
    .await;
    let data = h.data_dir_with(marker);
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"TOP-SECRET").unwrap();
    // What sandboxed code could plant: links to files and directories outside, and a hard link.
    std::os::unix::fs::symlink(outside.path().join("secret"), data.join("leak")).unwrap();
    std::os::unix::fs::symlink(outside.path(), data.join("dirlink")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", data.join("passwd")).unwrap();
    std::fs::write(data.parent().unwrap().join("beside-data"), b"HIDDEN").unwrap();
    std::fs::hard_link(
        data.parent().unwrap().join("beside-data"),
        data.join("hard"),
    )
    .unwrap();

    for name in ["leak", "dirlink/secret", "passwd", "hard"] {
        let r = h
            .call(
                "GET",
                &format!("/files/content/{name}?{base}"),
                Some(A),
                Body::empty(),
            )
            .await;
        assert_aca_error(
            &r,
            StatusCode::BAD_REQUEST,
            "SessionRequestValidationFailed",
        );
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            !text.contains("TOP-SECRET") && !text.contains("HIDDEN") && !text.contains("root:"),
            "{name}: {text}"
        );
    }
    // Listing shows regular files only and never descends through a link.
    let list = h
        .call("GET", &format!("/files?{base}"), Some(A), Body::empty())
        .await
        .json();
    let names: Vec<&str> = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["properties"]["filename"].as_str().unwrap())
        .collect();
    assert!(
        !names.contains(&"leak") && !names.iter().any(|n| n.starts_with("dirlink")),
        "{names:?}"
    );

    // Writing through a directory link is refused; writing over a link replaces the link.
    let r = h
        .upload(
            &format!("/files/upload?{base}"),
            A,
            "multipart/form-data; boundary=m",
            multipart("m", "dirlink/new", b"x"),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(!outside.path().join("new").exists());
    for name in ["leak", "hard"] {
        let r = h
            .upload(
                &format!("/files/upload?{base}"),
                A,
                "multipart/form-data; boundary=m",
                multipart("m", name, b"replaced"),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{name}");
    }
    assert_eq!(
        std::fs::read(outside.path().join("secret")).unwrap(),
        b"TOP-SECRET"
    );
    assert_eq!(
        std::fs::read(data.parent().unwrap().join("beside-data")).unwrap(),
        b"HIDDEN"
    );
    // Deleting a link deletes the link, not its target; deleting through one is refused.
    let r = h
        .call(
            "DELETE",
            &format!("/files/passwd?{base}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = h
        .call(
            "DELETE",
            &format!("/files/dirlink/secret?{base}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(outside.path().join("secret").exists());
    assert!(Path::new("/etc/passwd").exists());

    // The native API refuses the same way.
    let s = h
        .json(
            "POST",
            "/v1/sessions",
            A,
            json!({"identifier": "link-0001"}),
        )
        .await
        .json();
    let id = s["id"].as_str().unwrap();
    let r = h
        .call(
            "GET",
            &format!("/v1/sessions/{id}/files/dirlink/secret/content"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "link_refused");
}
