"""The alerts wing's pages in the admin: the alert history with each alert's timeline, the operator's actions on alerts,
silences, a summary of a period, CSV export; alert rules, notification channels, routes and escalation; the
notifications with their delivery attempts.

Who may do what (queues/roles.py makes the groups):

- Support reads alerts, timelines, rules, silences and notifications (view permissions only).
- Operators also acknowledge, shelve and silence (``monitoring.acknowledge_alert``, ``add_silence``,
  ``change_silence``).
- Admins edit rules, channels, routes and escalation policies. A channel's config holds webhook URLs and keys,
  so only Admins see channels at all; everyone sees what was delivered where (notifications name the channel).

Alerts are history: nobody adds, edits or deletes one by hand. Every change to an alert goes through a service of
the alerts wing (actions), which writes the timeline event and the audit row. Each action is a confirmation page (GET)
and a POST, with the permission checked on the server for both; the service's refusals (``AlertError``) come
back as admin messages, or on the form when they name one of its fields. Edits of rules, channels, routes and
policies through their forms are audit rows too (``AuditedChangesMixin``).
"""
