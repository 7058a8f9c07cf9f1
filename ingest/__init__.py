"""Ingest: MQTT → store. Validate, batch, write, acknowledge after the durable write, spool
while the store is down, dead-letter what cannot be taken, list the devices the registry does
not know."""

from ingest.cli import add_parsers
from ingest.deadletter import DeadLetter, DeadLetterStore, read_dead_letter_counts
from ingest.service import IngestConfig, IngestService
from ingest.unregistered import UNKNOWN_DEVICE, read_unregistered

__all__ = ["UNKNOWN_DEVICE", "DeadLetter", "DeadLetterStore", "IngestConfig", "IngestService",
           "add_parsers", "read_dead_letter_counts", "read_unregistered"]
