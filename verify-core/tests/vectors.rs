use serde_json::Value;
use std::path::Path;
use verify_core::crypto::all_backends;
use verify_core::jws;
use verify_core::keys::KeyStore;

#[test]
fn dump() {
    let doc: Value = serde_json::from_slice(&std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/vectors/wycheproof/json_web_signature_test.json")).unwrap()).unwrap();
    let b = all_backends()[0];
    for g in doc["testGroups"].as_array().unwrap() {
        let jwk = g.get("public").or(g.get("private")).unwrap().clone();
        let mut jwk = jwk;
        if jwk.get("alg").is_none() { jwk["alg"] = "ES256".into(); }
        let store = KeyStore::from_jwks(serde_json::json!({"keys":[jwk]}).to_string().as_bytes(), Path::new("x"), b);
        let (store, note) = match store { Ok(s) => (s, "loaded".to_string()), Err(e) => (KeyStore::default(), e.to_string()) };
        println!("GROUP {} {}", g["tests"][0]["tcId"], note);
        for t in g["tests"].as_array().unwrap() {
            let bytes = t["jws"].as_str().unwrap().as_bytes();
            let r = jws::verify(bytes, &store, 1 << 20);
            println!("  {} {} {:?}", t["tcId"], t["result"], r.map(|v| v.kid).map_err(|e| (e.reason, e.detail)));
        }
    }
}
