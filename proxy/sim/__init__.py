"""Stand-in upstreams that ship in the package: the Groq simulator and the scripted upstream the tests use."""
