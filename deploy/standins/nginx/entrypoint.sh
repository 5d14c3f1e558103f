#!/bin/sh
# Render /etc/nginx/conf.d/*.conf into /etc/nginx/rendered/ for Debian 12's nginx under podman, then start nginx.
set -eu
dns=$(awk '/^nameserver/ { print $2; exit }' /etc/resolv.conf)
mkdir -p /etc/nginx/rendered
for conf in /etc/nginx/conf.d/*.conf; do
    [ -e "$conf" ] || continue
    sed -e '/^[[:space:]]*http2 on;/d' -e 's/listen 443 ssl default_server;/listen 443 ssl http2 default_server;/' \
        -e "s/resolver 127\.0\.0\.11/resolver ${dns:-127.0.0.11}/" "$conf" >"/etc/nginx/rendered/$(basename "$conf")"
done
exec "$@"
