//! The one error type of `attest`. Each variant names the operation (the TPM command,
//! the file, the check) and carries what a person needs to act on it.

use std::path::PathBuf;

/// Errors of this crate. Untrusted input (a quote, a binding, a peer certificate, an
/// SVID file) can cause the `Quote*`, `Binding*`, `Peer*`, `Svid*`, `Bundle*` and
/// `Malformed` variants; a TPM that is absent or refuses causes `Tpm*`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The TCTI string is not one we accept.
    #[error("TCTI `{tcti}`: {message}")]
    TctiInvalid { tcti: String, message: String },

    /// No TPM answered at the TCTI.
    #[error("no TPM reachable at TCTI `{tcti}`: {message}")]
    TpmUnreachable { tcti: String, message: String },

    /// A TPM command failed.
    #[error("TPM {command} (TCTI `{tcti}`): {message}")]
    Tpm {
        command: &'static str,
        tcti: String,
        message: String,
    },

    /// The persistent handle holds an object that is not our identity key.
    #[error("persistent handle {handle:#010x} holds {found}, not an identity key made by attest; pick another --handle or evict it")]
    ForeignPersistentObject { handle: u32, found: String },

    /// A PCR selection (`sha256:0,7`) is malformed.
    #[error("PCR selection `{selection}`: {message}")]
    PcrSelection { selection: String, message: String },

    /// Unsealing refused because bound PCRs changed since the key was sealed.
    #[error("{}: sealed key `{kid}` cannot be unsealed: PCR {} no longer match the values it was sealed to", file.display(), pcr_list(pcrs))]
    PcrMismatch {
        file: PathBuf,
        kid: String,
        /// `sha256:16` style names of the PCRs that differ.
        pcrs: Vec<String>,
    },

    /// A sealed key file is malformed or inconsistent.
    #[error("{}: sealed key file: {message}", file.display())]
    SealedFile { file: PathBuf, message: String },

    /// The secret to seal is unusable.
    #[error("secret to seal: {0}")]
    Secret(String),

    /// Reading or writing a file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A structure (TPMS_ATTEST, TPMT_PUBLIC, JSON document) does not parse.
    #[error("{what}: {message}")]
    Malformed { what: &'static str, message: String },

    /// Quote verification failed.
    #[error("quote rejected: {0}")]
    Quote(QuoteFailure),

    /// Binding verification failed.
    #[error("binding rejected: {0}")]
    Binding(BindingFailure),

    /// An SVID (ours, from files or the Workload API) is unusable.
    #[error("SVID {source_name}: {message}")]
    Svid {
        source_name: String,
        message: String,
    },

    /// A trust bundle is unusable.
    #[error("trust bundle {source_name}: {message}")]
    Bundle {
        source_name: String,
        message: String,
    },

    /// The SPIFFE Workload API failed.
    #[error("SPIFFE Workload API at `{endpoint}`: {message}")]
    WorkloadApi { endpoint: String, message: String },

    /// A peer certificate was refused.
    #[error("peer refused: {0}")]
    Peer(String),

    /// A SPIFFE ID failed the strict parser.
    #[error("SPIFFE ID `{id}`: {message}")]
    SpiffeId { id: String, message: String },

    /// A certificate or CSR could not be made or issued.
    #[error("certificate: {0}")]
    Certificate(String),
}

/// Why a quote was rejected, precisely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuoteFailure {
    #[error("the signature does not verify with the TPM key")]
    SignatureInvalid,
    #[error("not a TPM-generated quote (magic {magic:#010x}, type {tag:#06x})")]
    NotAQuote { magic: u32, tag: u16 },
    #[error("the nonce (extra data) is not the expected one")]
    NonceMismatch,
    #[error("the quote covers PCRs {found}, the reference has {expected}")]
    SelectionMismatch { expected: String, found: String },
    #[error("the quoted PCR digest does not match the PCR values carried with it (tampered)")]
    ValuesTampered,
    #[error("PCR {} differ from the reference", pcr_list(.0))]
    PcrMismatch(Vec<String>),
}

/// Why a binding was rejected, precisely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindingFailure {
    #[error("the statement does not parse: {0}")]
    Malformed(String),
    #[error("the statement is for another SVID: it names certificate sha256:{found}, the SVID given is sha256:{expected}")]
    AnotherSvid { expected: String, found: String },
    #[error("the statement is for SPIFFE ID `{found}`, expected `{expected}`")]
    AnotherSpiffeId { expected: String, found: String },
    #[error("the statement is for another TPM key: thumbprint {found}, expected {expected}")]
    AnotherTpmKey { expected: String, found: String },
    #[error("the statement was made with other PCR values: {} differ from the reference", pcr_list(.0))]
    OtherPcrs(Vec<String>),
    #[error("the statement covers PCRs {found}, the reference has {expected}")]
    OtherPcrSelection { expected: String, found: String },
    #[error("the quote does not cover the statement's PCR values")]
    QuoteNotForStatement,
    #[error("the statement says the SVID key is {claimed} the TPM, but it is {actual}")]
    KeyClaimFalse {
        claimed: &'static str,
        actual: &'static str,
    },
    #[error("made on a software TPM ({0}); refused without --allow-software-tpm")]
    SoftwareTpm(String),
}

fn pcr_list(pcrs: &[String]) -> String {
    pcrs.join(", ")
}

impl AttestError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> AttestError {
        AttestError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn malformed(what: &'static str, message: impl Into<String>) -> AttestError {
        AttestError::Malformed {
            what,
            message: message.into(),
        }
    }
}

pub type Result<T, E = AttestError> = std::result::Result<T, E>;
