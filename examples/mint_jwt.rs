//! Print an ES256 JWT for bench/load.sh.
//!
//! Usage: mint_jwt PRIVATE_KEY_PEM KID CLAIMS_JSON

use jsonwebtoken::{Algorithm, EncodingKey, Header};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [key, kid, claims] = args.as_slice() else {
        eprintln!("usage: mint_jwt PRIVATE_KEY_PEM KID CLAIMS_JSON");
        std::process::exit(2);
    };
    let pem = std::fs::read(key).expect("read key");
    let claims: serde_json::Value = serde_json::from_str(claims).expect("claims JSON");
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.clone());
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_ec_pem(&pem).expect("EC key"),
    )
    .expect("sign");
    println!("{token}");
}
