"""The live wing: the dashboard in the admin that updates itself.

One sampler of the deployment computes a sample a second while anyone watches (``dashboard``) and pushes it over
WebSockets (``consumers``, ``routing``) with the fleet's and the alerts' new events (``events``, which also keeps
the presence of the watchers); ``views`` serve the page and the last hour it draws first. Built on the metrics wing;
the alerts wing's events reach it through signals the models send, so it depends on no alert code.
"""
