"""The self-service enrollment portal: users sign in with the directory password
(and a code once enrolled), see their MFA status and days left, and set up or
reset their own TOTP key. See proxy/portal/site.py."""
