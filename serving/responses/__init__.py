"""The Responses API: requests translated to chat completions, and the stored responses."""
