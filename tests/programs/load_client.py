"""An HTTP/1.1 client for wirespan's tests: GET URL N times on one keep-alive connection
(reconnecting if the server closes it) and print each status on its own line."""
import http.client
import sys
import urllib.parse


def main():
    url = urllib.parse.urlparse(sys.argv[1])
    n = int(sys.argv[2])
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    statuses = []
    for _ in range(n):
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        statuses.append(str(r.status))
        if r.will_close:
            conn.close()
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.close()
    print("\n".join(statuses))


if __name__ == "__main__":
    main()
