"""Microsoft identity platform: clouds, app registration, sign-in flows, tokens and error explanations."""
