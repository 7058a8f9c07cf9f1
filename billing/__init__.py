"""Billing: tariffs, meter-register accounting, settlement, hash-chained ledger (issue 5)."""
