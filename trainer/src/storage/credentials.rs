//! Object-store clients from the standard environment variables, and a check, before any request, that
//! some credential source is configured.
//!
//! Without one, object_store would fall back to the cloud's instance-metadata service; off the cloud that
//! means a long wait and an obscure error at the first checkpoint. So a run without credentials fails at
//! start with the variables to set, and the metadata service is used only when asked for with
//! `VISSL_STORAGE_INSTANCE_CREDENTIALS=1` (or the provider's own metadata-endpoint variable).

use super::{Location, Scheme, StorageError, StorageSettings};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::limit::LimitStore;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};
use std::sync::Arc;

/// Opt-in to credentials from the cloud's instance-metadata service (EC2 instance profiles, GKE workload
/// identity through the metadata server, Azure managed identity).
pub const INSTANCE_CREDENTIALS_VAR: &str = "VISSL_STORAGE_INSTANCE_CREDENTIALS";

/// Environment variables that each give a store its credentials (any one is enough).
fn credential_sources(scheme: Scheme) -> &'static [&'static str] {
    match scheme {
        Scheme::S3 => &[
            "AWS_ACCESS_KEY_ID",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_SKIP_SIGNATURE",
            "AWS_METADATA_ENDPOINT",
        ],
        Scheme::Gcs => &[
            "GOOGLE_SERVICE_ACCOUNT",
            "GOOGLE_SERVICE_ACCOUNT_PATH",
            "GOOGLE_SERVICE_ACCOUNT_KEY",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "SERVICE_ACCOUNT",
            "GOOGLE_SKIP_SIGNATURE",
        ],
        Scheme::Azure => &[
            "AZURE_STORAGE_ACCOUNT_KEY",
            "AZURE_STORAGE_ACCESS_KEY",
            "AZURE_STORAGE_SAS_KEY",
            "AZURE_STORAGE_SAS_TOKEN",
            "AZURE_STORAGE_TOKEN",
            "AZURE_CLIENT_SECRET",
            "AZURE_FEDERATED_TOKEN_FILE",
            "AZURE_STORAGE_USE_EMULATOR",
            "AZURE_USE_AZURE_CLI",
            "AZURE_SKIP_SIGNATURE",
        ],
    }
}

fn is_set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

/// gcloud's application-default credentials file, which the GCS client also reads.
fn gcloud_default_credentials_exist() -> bool {
    std::env::var_os("HOME").is_some_and(|home| {
        std::path::Path::new(&home)
            .join(".config/gcloud/application_default_credentials.json")
            .is_file()
    })
}

/// Fail unless some credential source for `scheme` is configured (see the module docs).
pub fn check_configured(scheme: Scheme, location: &Location) -> Result<(), StorageError> {
    let sources = credential_sources(scheme);
    let found = sources.iter().any(|v| is_set(v))
        || is_set(INSTANCE_CREDENTIALS_VAR)
        || (scheme == Scheme::Gcs && gcloud_default_credentials_exist());
    if found {
        return Ok(());
    }
    let hint = match scheme {
        Scheme::S3 => {
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_ENDPOINT_URL, AWS_REGION and \
             AWS_ALLOW_HTTP=true for an S3-compatible server such as MinIO), or AWS_WEB_IDENTITY_TOKEN_FILE \
             with AWS_ROLE_ARN"
        }
        Scheme::Gcs => {
            "set GOOGLE_SERVICE_ACCOUNT (a key file) or GOOGLE_APPLICATION_CREDENTIALS, or GOOGLE_SERVICE_ACCOUNT_KEY"
        }
        Scheme::Azure => {
            "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY, a SAS token \
             (AZURE_STORAGE_SAS_TOKEN), or AZURE_CLIENT_ID/AZURE_CLIENT_SECRET/AZURE_TENANT_ID"
        }
    };
    Err(StorageError::Credentials {
        location: location.to_string(),
        reason: format!(
            "no credentials for {}:// in the environment: {hint}; or {INSTANCE_CREDENTIALS_VAR}=1 to use \
             the cloud's instance-metadata credentials (one of {} must be set)",
            scheme.as_str(),
            sources.join(", ")
        ),
    })
}

fn retry_config(settings: &StorageSettings) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: settings.initial_backoff,
            max_backoff: settings.max_backoff,
            base: 2.0,
        },
        max_retries: settings.max_retries,
        retry_timeout: settings.retry_timeout,
    }
}

/// Timeouts as the client config strings object_store parses (humantime).
fn client_timeouts(settings: &StorageSettings) -> [(ClientConfigKey, String); 2] {
    [
        (
            ClientConfigKey::ConnectTimeout,
            format!("{}ms", settings.connect_timeout.as_millis().max(1)),
        ),
        (
            ClientConfigKey::Timeout,
            format!("{}ms", settings.request_timeout.as_millis().max(1)),
        ),
    ]
}

/// A client for `bucket` (an Azure container for `az://`), configured from the environment and
/// `settings`, with at most `max_concurrent_requests` requests in flight.
pub fn build_store(
    scheme: Scheme,
    bucket: &str,
    settings: &StorageSettings,
    location: &Location,
) -> Result<Arc<dyn ObjectStore>, StorageError> {
    check_configured(scheme, location)?;
    let invalid = |e: object_store::Error| StorageError::InvalidLocation {
        location: location.to_string(),
        reason: format!("cannot configure the {} client: {e}", scheme.as_str()),
    };
    let limit = settings.max_concurrent_requests.max(1);
    let timeouts = client_timeouts(settings);
    let store: Arc<dyn ObjectStore> = match scheme {
        Scheme::S3 => {
            let builder = timeouts.into_iter().fold(
                AmazonS3Builder::from_env().with_bucket_name(bucket),
                |b, (key, value)| b.with_config(AmazonS3ConfigKey::Client(key), value),
            );
            let store = builder
                .with_retry(retry_config(settings))
                .build()
                .map_err(invalid)?;
            Arc::new(LimitStore::new(store, limit))
        }
        Scheme::Gcs => {
            let builder = timeouts.into_iter().fold(
                GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket),
                |b, (key, value)| b.with_config(GoogleConfigKey::Client(key), value),
            );
            let store = builder
                .with_retry(retry_config(settings))
                .build()
                .map_err(invalid)?;
            Arc::new(LimitStore::new(store, limit))
        }
        Scheme::Azure => {
            let builder = timeouts.into_iter().fold(
                MicrosoftAzureBuilder::from_env().with_container_name(bucket),
                |b, (key, value)| b.with_config(AzureConfigKey::Client(key), value),
            );
            let store = builder
                .with_retry(retry_config(settings))
                .build()
                .map_err(invalid)?;
            Arc::new(LimitStore::new(store, limit))
        }
    };
    Ok(store)
}
