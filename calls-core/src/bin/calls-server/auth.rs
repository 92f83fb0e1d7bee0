//! Who may join: signed join tokens (HS256 JWT from the chat server) or, in demo mode on
//! loopback, anyone. Also mints time-limited TURN REST credentials.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use calls_core::Grants;
use hmac::{Hmac, Mac};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{ServerConfig, TurnServer};

/// Grants as they appear in a token; missing fields are `false` except `subscribe`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TokenGrants {
    #[serde(default)]
    pub audio: bool,
    #[serde(default)]
    pub video: bool,
    #[serde(default)]
    pub screen: bool,
    #[serde(default = "yes")]
    pub subscribe: bool,
    /// May be recorded (default); `false` keeps the participant out of every recording.
    #[serde(default = "yes")]
    pub recordable: bool,
    /// May start and stop the call's recording from its WebSocket (`{"type":"record"}`).
    #[serde(default)]
    pub record: bool,
}

fn yes() -> bool {
    true
}

/// The claims the chat server signs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The call (channel) the token is for.
    pub call: String,
    /// The user id.
    pub sub: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// What the user may do; absent: everything.
    #[serde(default)]
    pub grants: Option<TokenGrants>,
    /// Expiry (seconds since the Unix epoch).
    pub exp: u64,
}

/// Who is joining, after authorization.
#[derive(Debug, Clone)]
pub struct Admission {
    pub user: String,
    pub name: String,
    pub grants: Grants,
    /// May start and stop the call's recording (the token's `grants.record`; demo mode: yes).
    pub may_record: bool,
}

/// What a token is presented for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A new session: the token must be unexpired.
    Join,
    /// Taking back a session of the same user and call with its resume token: the JWT may
    /// have expired since the join (short-lived tokens), since the resume token itself only
    /// lives while the session does and for `reconnect_grace_s` after its socket dropped.
    /// Signature, `nbf`, `aud`, `iss` and the call are checked all the same.
    Resume,
}

/// Checks a join (or a resume) for `call`. Errors are the WebSocket close reason.
pub fn authorize(
    config: &ServerConfig,
    call: &str,
    user: Option<&str>,
    token: Option<&str>,
    purpose: Purpose,
) -> Result<Admission, String> {
    let Some(secret) = &config.auth_secret else {
        let user = user
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .unwrap_or("guest");
        if user.len() > 64 {
            return Err("user name longer than 64 characters".into());
        }
        return Ok(Admission {
            user: user.to_owned(),
            name: user.to_owned(),
            grants: Grants::ALL,
            may_record: true,
        });
    };
    let token = token.ok_or("a join token is required")?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    validation.validate_exp = purpose == Purpose::Join;
    // `nbf` is checked whenever a token has one; `aud` and `iss` when configured (and then
    // required).
    validation.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    match &config.auth_audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    if let Some(issuer) = &config.auth_issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    let data = decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => "token expired".to_owned(),
        jsonwebtoken::errors::ErrorKind::InvalidSignature => "token signature invalid".to_owned(),
        jsonwebtoken::errors::ErrorKind::ImmatureSignature => "token not valid yet".to_owned(),
        jsonwebtoken::errors::ErrorKind::InvalidAudience => {
            "token is for another audience".to_owned()
        }
        jsonwebtoken::errors::ErrorKind::InvalidIssuer => "token is from another issuer".to_owned(),
        _ => format!("token invalid: {e}"),
    })?;
    let claims = data.claims;
    if claims.call != call {
        return Err("token is for another call".into());
    }
    let (grants, may_record) = match claims.grants {
        Some(g) => (
            Grants::new(g.audio, g.video, g.screen, g.subscribe).with_recordable(g.recordable),
            g.record,
        ),
        None => (Grants::ALL, false),
    };
    Ok(Admission {
        name: claims.name.unwrap_or_else(|| claims.sub.clone()),
        user: claims.sub,
        grants,
        may_record,
    })
}

/// An RTCIceServer entry for the browser.
#[derive(Debug, Serialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// TURN REST credentials (draft-uberti-behave-turn-rest): username `expiry:user`, password
/// base64(HMAC-SHA1(secret, username)) — what coturn's `use-auth-secret` checks.
pub fn ice_servers(turn: &[TurnServer], user: &str) -> Vec<IceServer> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    turn.iter()
        .map(|t| match &t.secret {
            Some(secret) => {
                let username = format!("{}:{}", now + t.ttl_s, user);
                let credential = turn_password(secret, &username);
                IceServer {
                    urls: t.urls.clone(),
                    username: Some(username),
                    credential: Some(credential),
                }
            }
            None => IceServer {
                urls: t.urls.clone(),
                username: None,
                credential: None,
            },
        })
        .collect()
}

pub fn turn_password(secret: &str, username: &str) -> String {
    let mut mac =
        Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A random token (resume tokens), hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("OS randomness");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn config() -> ServerConfig {
        ServerConfig {
            auth_secret: Some(SECRET.to_owned()),
            ..ServerConfig::default()
        }
    }

    fn token(secret: &str, call: &str, exp_from_now: i64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let claims = Claims {
            call: call.to_owned(),
            sub: "u1".to_owned(),
            name: Some("Ada".to_owned()),
            grants: Some(TokenGrants {
                audio: true,
                video: false,
                screen: false,
                subscribe: true,
                recordable: true,
                record: false,
            }),
            exp: (now + exp_from_now) as u64,
        };
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn turn_password_matches_the_rest_spec() {
        // base64(HMAC-SHA1("secret", "1700000000:alice")), computed independently.
        assert_eq!(
            turn_password("secret", "1700000000:alice"),
            "d8soP47RbdIKLDUOpnJPVQyq5Ts="
        );
        let servers = ice_servers(
            &[TurnServer {
                urls: vec!["turn:127.0.0.1:3478".into()],
                secret: Some("s".into()),
                ttl_s: 60,
            }],
            "bob",
        );
        let username = servers[0].username.clone().unwrap();
        assert!(username.ends_with(":bob"));
        assert_eq!(
            servers[0].credential.as_deref(),
            Some(turn_password("s", &username).as_str())
        );
    }

    #[test]
    fn a_valid_token_admits_with_its_grants() {
        let admission = authorize(
            &config(),
            "room",
            None,
            Some(&token(SECRET, "room", 60)),
            Purpose::Join,
        )
        .unwrap();
        assert_eq!(admission.user, "u1");
        assert_eq!(admission.name, "Ada");
        assert_eq!(admission.grants, Grants::new(true, false, false, true));
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let c = config();
        assert_eq!(
            authorize(&c, "room", Some("x"), None, Purpose::Join).unwrap_err(),
            "a join token is required"
        );
        assert_eq!(
            authorize(
                &c,
                "room",
                None,
                Some(&token(SECRET, "room", -60)),
                Purpose::Join
            )
            .unwrap_err(),
            "token expired"
        );
        assert_eq!(
            authorize(
                &c,
                "room",
                None,
                Some(&token("another-secret-entirely-000000", "room", 60)),
                Purpose::Join
            )
            .unwrap_err(),
            "token signature invalid"
        );
        assert_eq!(
            authorize(
                &c,
                "room",
                None,
                Some(&token(SECRET, "other", 60)),
                Purpose::Join
            )
            .unwrap_err(),
            "token is for another call"
        );
        // Tampered payload: swap the claims segment for one naming another call.
        let good = token(SECRET, "room", 60);
        let other = token(SECRET, "other", 60);
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            other.split('.').nth(1).unwrap(),
            parts[2]
        );
        assert_eq!(
            authorize(&c, "other", None, Some(&forged), Purpose::Join).unwrap_err(),
            "token signature invalid"
        );
    }

    fn signed(claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn now_s() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// Finding 5 (issue 16): an expired join token cannot join, but can take its session back
    /// (resume) within the grace period, so short-lived tokens do not break resume.
    #[test]
    fn an_expired_token_resumes_but_does_not_join() {
        let c = config();
        let expired = token(SECRET, "room", -600);
        assert_eq!(
            authorize(&c, "room", None, Some(&expired), Purpose::Join).unwrap_err(),
            "token expired"
        );
        let admission = authorize(&c, "room", None, Some(&expired), Purpose::Resume).unwrap();
        assert_eq!(admission.user, "u1");
        // Still only for its own call.
        assert_eq!(
            authorize(&c, "other", None, Some(&expired), Purpose::Resume).unwrap_err(),
            "token is for another call"
        );
    }

    /// Finding 5 (issue 16): `nbf` is checked, and `aud` / `iss` when configured.
    #[test]
    fn not_before_audience_and_issuer_are_checked() {
        let mut c = config();
        let base = serde_json::json!({"call": "room", "sub": "u1", "exp": now_s() + 60});
        let mut early = base.clone();
        early["nbf"] = (now_s() + 600).into();
        assert_eq!(
            authorize(&c, "room", None, Some(&signed(early)), Purpose::Join).unwrap_err(),
            "token not valid yet"
        );
        c.auth_audience = Some("calls.example.com".into());
        c.auth_issuer = Some("chat.example.com".into());
        let mut good = base.clone();
        good["aud"] = "calls.example.com".into();
        good["iss"] = "chat.example.com".into();
        assert!(authorize(&c, "room", None, Some(&signed(good.clone())), Purpose::Join).is_ok());
        let mut other_aud = good.clone();
        other_aud["aud"] = "elsewhere".into();
        assert_eq!(
            authorize(&c, "room", None, Some(&signed(other_aud)), Purpose::Join).unwrap_err(),
            "token is for another audience"
        );
        let mut other_iss = good.clone();
        other_iss["iss"] = "mallory".into();
        assert_eq!(
            authorize(&c, "room", None, Some(&signed(other_iss)), Purpose::Join).unwrap_err(),
            "token is from another issuer"
        );
        // Configured means required.
        assert!(authorize(&c, "room", None, Some(&signed(base)), Purpose::Join).is_err());
    }

    #[test]
    fn demo_mode_admits_by_name() {
        let admission = authorize(
            &ServerConfig::default(),
            "room",
            Some("  Bob "),
            None,
            Purpose::Join,
        )
        .unwrap();
        assert_eq!(admission.user, "Bob");
        assert_eq!(admission.grants, Grants::ALL);
    }
}
