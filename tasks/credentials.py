"""Load the credentials blocks a config names, where the work runs (flow and tasks).

``storage.credentials_block`` names a prefect-aws ``AwsCredentials`` block
(``aws-credentials/NAME``, or a bare ``NAME``) or ``MinIOCredentials``
(``minio-credentials/NAME``). The block is loaded from the Prefect API in the process
that does the I/O (the flow for planning, every task run for its shards, on a Dask or
Ray worker too), turned into key, secret and token through the block's own boto3
session (so profiles and role assumption work), and registered in memory with
:mod:`clipbatch.io.credentials`. Only the block's name is ever a parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from clipbatch.config import EmbedConfig, StorageOptions
from clipbatch.errors import ConfigError
from clipbatch.io import credentials

BLOCK_TYPES = ("aws-credentials", "minio-credentials")


def storage_parts(config: EmbedConfig) -> Iterator[StorageOptions]:
    yield config.source.storage
    yield config.sink.storage
    yield config.model.storage


def load_credentials(config: EmbedConfig) -> None:
    """Register every block ``config`` names that this process has not loaded yet."""
    load_storage_credentials(storage_parts(config))


def load_storage_credentials(storages: Iterable[StorageOptions]) -> None:
    have = credentials.registered()
    for storage in storages:
        ref = storage.credentials_block
        if ref and ref not in have:
            have[ref] = block_credentials(ref)
            credentials.register(ref, have[ref])


def block_credentials(ref: str) -> credentials.Credentials:
    slug, _, name = ref.rpartition("/")
    slug = slug or "aws-credentials"
    if slug not in BLOCK_TYPES:
        raise ConfigError(
            f"credentials block {ref!r}: the block type must be one of {', '.join(BLOCK_TYPES)}"
        )
    try:
        from prefect_aws import AwsCredentials, MinIOCredentials
    except ImportError as e:
        raise ConfigError(
            f"credentials block {ref!r} needs prefect-aws: pip install 'clipbatch[aws]'"
        ) from e
    block_type = AwsCredentials if slug == "aws-credentials" else MinIOCredentials
    try:
        block = block_type.load(name)
    except ValueError as e:  # Prefect's "unable to find block document named ..."
        raise ConfigError(f"credentials block {ref!r} was not found: {e}") from e
    session = block.get_boto3_session()
    found = session.get_credentials()
    if found is None:
        raise ConfigError(f"credentials block {ref!r} holds no credentials")
    frozen = found.get_frozen_credentials()
    params = getattr(block, "aws_client_parameters", None)
    return credentials.Credentials(
        key=frozen.access_key,
        secret=frozen.secret_key,
        token=frozen.token,
        endpoint_url=getattr(params, "endpoint_url", None),
        region=session.region_name,
    )
