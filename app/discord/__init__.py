"""The Discord front end: a player posts a photo and a few words, the studio answers with a picture.

Two ways to connect, one handler (:class:`app.discord.frontend.DiscordFrontEnd`):

* HTTP interactions (``POST /discord/interactions``, :mod:`app.discord.interactions`) for a studio
  with a public URL: Discord signs each request (Ed25519), the studio answers a deferred response at
  once and edits it with the picture when the job is done;
* a gateway bot (``launch.py bot``, :mod:`app.discord.gateway`, discord.py) for a studio behind a
  LAN's NAT: the same ``/draw`` command, the same handler.

Either way the job goes through the studio's durable queue as the user ``discord:<id>``, and a
restart keeps the pending requests (``data/discord.sqlite3``) and still answers them.
"""
