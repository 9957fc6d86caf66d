"""The chaos suite: faults production brings, with an execution ledger (issue 15)."""
