"""The front door: the command line, the aiohttp server and its routes, config, request validation, errors."""
