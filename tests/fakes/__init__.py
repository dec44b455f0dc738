"""Honest fakes for what a real engine cannot do on demand (die mid-stream, hang)."""
