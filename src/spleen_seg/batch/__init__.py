"""Many cases: inputs and case ids, the case loop with its atomic case folders, the summary."""
