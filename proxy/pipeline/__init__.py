"""The flow of one request: its context, the policies, the chain of attempts and the commit point, the client stream."""
